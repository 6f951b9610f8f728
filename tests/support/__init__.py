"""Test helpers that are plain modules, not fixtures: services a test starts for itself (a private
redis-server, a fault-injecting S3 proxy). The conftests declare fixtures on top of them."""
