"""The demo and its local servers (a mail sink and a webhook receiver), also used by the tests."""
