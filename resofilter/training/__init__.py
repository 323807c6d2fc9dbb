"""resofilter.training"""
