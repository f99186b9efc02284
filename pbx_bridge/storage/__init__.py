"""PostgreSQL: schema migrations and the batched call-record writer."""
