// Storage for the Functions host (blobs: leases, timer locks, keys), the Flex Consumption deployment
// container, and the gateway's tables (quota, ledger, callers, roll-ups, alerts, stored-response owners).
// Shared keys are off: every client (host, deployment, gateway) authenticates with Entra ID.
param name string
param location string
param tags object = {}
param deploymentContainerName string
@description('Table names; the prefix must match GATEWAY_TABLE_PREFIX.')
param tableNames array
// Geo-zone-redundant by default: the cost ledger is billing data and should survive a regional outage.
// Dev may choose LRS.
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_GZRS'])
param skuName string = 'Standard_GZRS'

resource account 'Microsoft.Storage/storageAccounts@2025-01-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    isLocalUserEnabled: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      // Flex Consumption without VNet integration reaches storage over the public endpoint; access is
      // still Entra-only (no shared keys, no SAS). See .checkov.yaml for the VNet follow-up.
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: { enabled: true, keyType: 'Account' }
        file: { enabled: true, keyType: 'Account' }
        queue: { enabled: true, keyType: 'Account' }
        table: { enabled: true, keyType: 'Account' }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2025-01-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2025-01-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2025-01-01' = {
  parent: account
  name: 'default'
}

// Created here as well as lazily by the gateway (its create is then a no-op): the tables exist before the
// first request, show up in what-if, and survive as named resources of the deployment.
resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2025-01-01' = [for table in tableNames: {
  parent: tableService
  name: table
}]

output id string = account.id
output name string = account.name
output blobEndpoint string = account.properties.primaryEndpoints.blob
output tableEndpoint string = account.properties.primaryEndpoints.table
output deploymentContainerUrl string = '${account.properties.primaryEndpoints.blob}${deploymentContainerName}'
