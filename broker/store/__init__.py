"""The broker's durable state: the SQLite job journal and the content-addressed artifact store. No sockets."""
