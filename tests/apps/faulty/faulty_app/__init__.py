"""A ClientApp that misbehaves on purpose, for the tests of fault handling."""
