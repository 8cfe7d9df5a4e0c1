"""pyvision_rl.engines"""
