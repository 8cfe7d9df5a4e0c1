"""pyvision_rl.agent"""
