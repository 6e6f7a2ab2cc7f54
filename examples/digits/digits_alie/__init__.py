"""A Flower app: robust aggregation on the digits data under the ALIE attack."""
