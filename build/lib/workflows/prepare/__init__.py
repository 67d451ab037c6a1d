"""The prepare stage: raw records in, tokenized, masked, packed Parquet shards out (Ray Data)."""
