"""A tiny Flower app that tests the deployment machinery: every node answers with its partition."""
