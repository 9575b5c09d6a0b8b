"""What every FedEx Stream actor shares: settings, records and the one wire codec,
topic specs, Kafka clients, the local Kafka runner, the model zoo, the checkpoint
store, the model server and the CLI."""

__version__ = "0.1.0"
