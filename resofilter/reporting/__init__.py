"""resofilter.reporting"""
