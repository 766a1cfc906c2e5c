"""The client side: one connection's protocol and flow control, the request's
edge (what routing decodes), and the gate every connection passes at its accept."""
