"""resofilter.selection"""
