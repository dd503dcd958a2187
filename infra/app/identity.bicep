// User-assigned managed identity for the Function App. One identity, created before the app, so role
// assignments exist (and have propagated) by the time the host first starts; a system-assigned identity
// would only exist after the site and would be recreated with it.
param name string
param location string
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
