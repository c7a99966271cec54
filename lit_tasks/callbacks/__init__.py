"""lit_tasks.callbacks"""
