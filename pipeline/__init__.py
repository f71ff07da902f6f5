"""cqlsac.pipeline"""
