"""Access control: tenants, API keys and their scopes, and usage per minute, stored beside the registry."""
