"""resofilter.features"""
