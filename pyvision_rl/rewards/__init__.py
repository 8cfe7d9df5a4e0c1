"""pyvision_rl.rewards"""
