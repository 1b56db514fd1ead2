from kledger.cli import run

run()
