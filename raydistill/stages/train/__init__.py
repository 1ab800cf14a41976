"""stages/train"""
