"""pyvision_rl.data"""
