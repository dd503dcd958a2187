// Key Vault for the few values that are secrets. Most of the gateway has no keys at all (managed identity
// to storage, Azure OpenAI, App Insights; web identity to Bedrock). What remains: the alert webhook URL
// (Teams/Slack webhook URLs embed a token).
param name string
param location string
param tags object = {}
@secure()
@description('Alert webhook URL; stored as a secret when non-empty.')
param alertWebhookUrl string = ''
@description('The app reads the secret (main.bicep: alertWebhookEnabled or a URL passed now; it stays true on redeploys without the URL).')
param alertWebhookEnabled bool = false

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      // Key Vault references from a Flex Consumption app without VNet integration arrive over the
      // public endpoint; App Service is not a "trusted service" for the firewall bypass.
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource alertWebhookSecret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = if (!empty(alertWebhookUrl)) {
  parent: vault
  name: 'alert-webhook-url'
  properties: {
    value: alertWebhookUrl
    contentType: 'text/uri-list'
    attributes: {
      enabled: true
    }
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
// The secret's URI (no version: the app picks up rotations). Empty when no webhook is configured.
// Derived from alertWebhookEnabled only: an output must not be an expression of a @secure() parameter.
output alertWebhookSecretUri string = alertWebhookEnabled ? '${vault.properties.vaultUri}secrets/alert-webhook-url' : ''
