"""stages/select"""
