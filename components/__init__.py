"""cqlsac.components"""
