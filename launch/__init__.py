"""Runner recipes: Dataflow (GPU, TPU) and TPU VMs. docs/launch.md walks through them."""
import argparse


def launcher_parser(module: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The command line of `python -m launch.<module>`."""
    return argparse.ArgumentParser(prog=f"python -m launch.{module}", description=description, epilog=epilog)
