"""cqlsac.datasets"""
