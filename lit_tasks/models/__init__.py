"""lit_tasks.models"""
