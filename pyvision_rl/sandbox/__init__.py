"""pyvision_rl.sandbox"""
