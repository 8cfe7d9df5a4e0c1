"""pyvision_rl.learner"""
