"""resofilter.models"""
