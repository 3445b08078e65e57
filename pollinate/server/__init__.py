"""What runs on the coordinator: the Flower ServerApp and each method's server half (a Strategy)."""
