"""pyvision_rl.models"""
