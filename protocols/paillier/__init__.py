"""Packed Paillier: clients encrypt, a server adds, a separate key holder decrypts.

Needs phe (and gmpy2 for speed); nothing here is imported until a Paillier session is opened.
"""
