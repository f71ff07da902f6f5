"""The `cqlsac` command line."""

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cqlsac", description="Offline-to-online RL with CQL-SAC on TorchRL.")
    parser.parse_args(argv)
    parser.print_help()
    return 0
