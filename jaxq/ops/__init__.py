"""One module per op family; each declares its ops once through :class:`jaxq._op.Op`."""
