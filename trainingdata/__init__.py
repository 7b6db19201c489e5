"""Training data without torch: the supported formats (``formats``), leakage between splits (``leakage``) and
the hold-out split (``splits``). The gateway checks uploads with it; training trains on what it loads."""
