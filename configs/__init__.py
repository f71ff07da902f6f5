"""Example pipeline configs, installed with cqlsac so that `cqlsac run lunarlander` works from any folder."""
