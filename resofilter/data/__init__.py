"""resofilter.data"""
