"""The model node: the run plan (runplan), the engines (engines/), the supervisor that runs one, huge-page
staging of the weights (staging), and the mTLS gateway in front of it (gateway, admission)."""
