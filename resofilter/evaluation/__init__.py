"""resofilter.evaluation"""
