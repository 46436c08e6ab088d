"""The regional aggregator service (rounds, streaming FedAvg, privacy ledger, releases)."""
