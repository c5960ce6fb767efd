"""Speech data: log-mel features, the `prepare` tool that writes TFRecord shards, and their readers."""
