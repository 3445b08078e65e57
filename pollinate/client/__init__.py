"""What runs on an edge client: the Flower ClientApp and each method's client half."""
