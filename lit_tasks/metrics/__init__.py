"""lit_tasks.metrics"""
