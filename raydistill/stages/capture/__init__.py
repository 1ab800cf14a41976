"""stages/capture"""
