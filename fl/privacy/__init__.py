"""Privacy mathematics and records: accountants, noise, clipping, distributed noise, and the
hash-chained files that keep spent budget (a node's ledger, the server's release journal)."""
