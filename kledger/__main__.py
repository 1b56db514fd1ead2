from kledger.cli.main import run

run()
