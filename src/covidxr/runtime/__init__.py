"""The runtime: what prediction needs (decoding, lungs, engines, answers, the API and the service), torch-free.

It never imports ``covidxr.lab``; the lab builds on it.
"""
