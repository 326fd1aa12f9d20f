"""Packed Paillier: clients encrypt and tag, a server relays, a separate key holder decrypts.

Needs phe and gmpy2; nothing here is imported until a Paillier session is opened.
"""
