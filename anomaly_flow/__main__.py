from anomaly_flow.cli import main

main()
