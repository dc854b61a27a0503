from anomaly_flow.cli import run

run()
