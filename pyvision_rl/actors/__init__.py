"""pyvision_rl.actors"""
